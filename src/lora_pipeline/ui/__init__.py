"""``lora-pipeline ui``: a local web workbench over the project (captions review, a training queue, the LoRA
library). It is a view: every caption rule, fingerprint, lock and generation step is the project's own code;
training, captioning and generation run as the project's own CLI commands in separate processes."""
