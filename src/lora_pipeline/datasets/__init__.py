"""Custom Kedro datasets, only where kedro-datasets has none that fits."""

from lora_pipeline.datasets.cache import CacheDataset
from lora_pipeline.datasets.files import CheckpointDataset, PretrainedFolderDataset, RawFileDataset
from lora_pipeline.datasets.image_folder import ImageFolder, ImageFolderDataset, VersionedImageFolderDataset
from lora_pipeline.datasets.lora_weights import DiffusersLoraDataset, LoraWeightsDataset
from lora_pipeline.datasets.reviewed_captions import ReviewedCaptionsDataset
from lora_pipeline.datasets.summary import ModelJSONDataset, TrainingSummaryDataset

__all__ = [
    "CacheDataset", "CheckpointDataset", "DiffusersLoraDataset", "ImageFolder", "ImageFolderDataset",
    "LoraWeightsDataset", "ModelJSONDataset", "PretrainedFolderDataset", "RawFileDataset", "ReviewedCaptionsDataset",
    "TrainingSummaryDataset",
    "VersionedImageFolderDataset",
]
