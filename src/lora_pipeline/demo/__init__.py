"""Demo fixtures, kept out of the ML library: tiny offline models and generated demo data.

    python -m lora_pipeline.demo      # builds data/06_models/tiny-* and data/01_raw/* (nothing is downloaded)
"""

from lora_pipeline.demo.assets import (  # noqa: F401
    build_demo,
    build_demo_holdout,
    build_demo_images,
    build_demo_stripes,
    main,
    write_demo_llm_data,
    write_demo_prompts,
    write_demo_review,
)
