from lora_pipeline.demo.assets import main

main()
