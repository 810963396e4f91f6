"""Custom Kedro datasets, only where kedro-datasets has none that fits."""

from lora_pipeline.datasets.cache import CacheDataset
from lora_pipeline.datasets.files import PretrainedFolderDataset, RawFileDataset
from lora_pipeline.datasets.image_folder import ImageFolder, ImageFolderDataset, VersionedImageFolderDataset
from lora_pipeline.datasets.lora_weights import DiffusersLoraDataset, LoraWeightsDataset
from lora_pipeline.datasets.reviewed_captions import ReviewedCaptionsDataset
from lora_pipeline.datasets.summary import TrainingSummaryDataset

__all__ = [
    "CacheDataset", "DiffusersLoraDataset", "ImageFolder", "ImageFolderDataset", "LoraWeightsDataset",
    "PretrainedFolderDataset", "RawFileDataset", "ReviewedCaptionsDataset", "TrainingSummaryDataset",
    "VersionedImageFolderDataset",
]
