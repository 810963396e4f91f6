from lora_pipeline.demo.assets import main

if __name__ == "__main__":  # not in the processes that pre-train the bases (spawned: they import this module)
    main()
