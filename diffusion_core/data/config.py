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

    size / channels: every image becomes (size, size, channels) uint8; see `transforms` for the
    resize, crop and mode-conversion policy. val_fraction: the share of rows whose content hash
    places them in the validation split. alpha_background: the colour transparent pixels are
    composited onto. folder_labels: label images of a folder source by their top-level sub-folder.
    image_column / label_column: the columns read from a Parquet source (label_column None means
    "use a column named 'label' when there is one"). rows_per_row_group / rows_per_shard: Parquet
    layout; a row group is the unit a streaming reader holds in memory.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(8, ge=1, le=4096)
    channels: Literal[1, 3] = 1
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    alpha_background: AlphaBackground = "white"
    folder_labels: bool = True
    image_column: str = Field("image", min_length=1)
    label_column: str | None = None
    rows_per_row_group: int = Field(1024, ge=1)
    rows_per_shard: int = Field(65536, ge=1)

    @model_validator(mode="after")
    def _shard_holds_whole_row_groups(self) -> PrepareParameters:
        if self.rows_per_shard < self.rows_per_row_group:
            raise ValueError(
                f"rows_per_shard ({self.rows_per_shard}) must be >= rows_per_row_group "
                f"({self.rows_per_row_group})"
            )
        return self


class PrepareConfig(PrepareParameters):
    """A preparation job: which source, where the dataset goes, and the parameters.

    source: "digits" (scikit-learn's bundled 8x8 digits) or a path to an image folder, a .npy /
    .npz file or a .parquet file. output: a local directory or a pyarrow filesystem URI
    (file://, s3://, gs://).
    """

    source: str = Field("digits", min_length=1)
    output: str = Field(min_length=1)

    def parameters(self) -> PrepareParameters:
        return PrepareParameters(**self.model_dump(exclude={"source", "output"}))
