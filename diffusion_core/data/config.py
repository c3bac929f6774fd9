"""Parameters of dataset preparation: one model, one source of defaults.

The defaults prepare the built-in digits set as the pipeline expects it (8x8, one channel, about a
tenth held out for validation).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Where a transparent pixel ends up: the colour it is composited onto.
AlphaBackground = Literal["white", "black"]


class PrepareParameters(BaseModel):
    """Everything that decides the prepared dataset's content and layout (all of it is fingerprinted).

    The resize, crop and mode-conversion policy behind size / channels / alpha_background is in
    diffusion_core.data.transforms.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(8, ge=1, le=4096, description="every image becomes size x size")
    channels: Literal[1, 3] = Field(1, description="1 = grey (ITU-R 601-2 luma), 3 = RGB")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0,
                                description="share of rows whose content hash places them in val")
    alpha_background: AlphaBackground = Field("white", description="colour transparent pixels become")
    folder_labels: bool = Field(True, description="image folders: label = top-level sub-folder name")
    image_column: str = Field("image", min_length=1, description="Parquet sources: the image column")
    label_column: str | None = Field(
        None, description="Parquet sources: the label column; None = 'label' when the table has one")
    rows_per_row_group: int = Field(1024, ge=1, description="rows a streaming reader holds at once")
    rows_per_shard: int = Field(65536, ge=1, description="rows per Parquet file")

    @model_validator(mode="after")
    def _shard_holds_whole_row_groups(self) -> PrepareParameters:
        if self.rows_per_shard < self.rows_per_row_group:
            raise ValueError(
                f"rows_per_shard ({self.rows_per_shard}) must be >= rows_per_row_group "
                f"({self.rows_per_row_group})"
            )
        return self


class PrepareConfig(PrepareParameters):
    """A preparation job: which source, where the dataset goes (file://, s3://, gs:// or a local
    path), and the parameters."""

    source: str = Field("digits", min_length=1,
                        description="'digits' or a local image folder / .npy / .npz / .parquet path")
    output: str = Field(min_length=1, description="dataset directory: local path or pyarrow URI")

    def parameters(self) -> PrepareParameters:
        return PrepareParameters(**self.model_dump(exclude={"source", "output"}))
