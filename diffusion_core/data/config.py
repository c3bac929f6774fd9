"""Parameters of dataset preparation: one model, one source of defaults.

The defaults prepare the built-in digits set as the pipeline expects it (8x8, one channel, about a
tenth held out for validation), and bound what any one input may cost: an image's decoded pixels
and aspect ratio, the number of classes, the bytes of a source row group, the share of unreadable
files.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Where a transparent pixel ends up: the colour it is composited onto.
AlphaBackground = Literal["white", "black"]
# How a source's identity is computed: "content" hashes every byte; "metadata" hashes names, sizes,
# modification and change times and inode numbers (no file is read); "auto" is content when the
# source is at most content_fingerprint_max_bytes, metadata otherwise.
FingerprintMode = Literal["auto", "content", "metadata"]

GIB = 1 << 30


class PrepareParameters(BaseModel):
    """Everything that decides the prepared dataset's content and layout, plus the run policy.

    The content fields are fingerprinted: they are part of the dataset's version. The run-policy
    fields (RUN_POLICY_FIELDS) decide only whether a preparation goes ahead, fails, or how the source
    is identified, never which rows the dataset holds, so changing them never changes a fingerprint.
    The resize, crop and mode-conversion policy behind size / channels / alpha_background / the
    image limits is in diffusion_core.data.transforms.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    RUN_POLICY_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "max_unreadable_share", "source_fingerprint", "content_fingerprint_max_bytes",
        "max_source_row_group_bytes",
    })

    size: int = Field(8, ge=1, le=4096, description="every image becomes size x size")
    channels: Literal[1, 3] = Field(1, description="1 = grey (ITU-R 601-2 luma), 3 = RGB")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0,
                                description="share of rows whose content hash places them in val")
    alpha_background: AlphaBackground = Field("white", description="colour transparent pixels become")
    folder_labels: bool = Field(True, description="image folders: label = top-level sub-folder name")
    image_column: str = Field("image", min_length=1, description="Parquet sources: the image column")
    label_column: str | None = Field(
        None, description="Parquet sources: the label column; None = 'label' when the table has one")
    rows_per_row_group: int = Field(
        1024, ge=1, description="rows a streaming reader holds at once (fewer when a row group of "
        "them would exceed 128 MiB of pixels)")
    rows_per_shard: int = Field(65536, ge=1, description="rows per Parquet file")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, le=1 << 31,
        description="images with more decoded pixels (width x height) are skipped before decoding")
    max_aspect_ratio: float = Field(
        10.0, ge=1.0, le=1e6,
        description="images whose long side exceeds this many times the short side are skipped")
    max_classes: int = Field(
        10_000, ge=1, le=1_000_000,
        description="labels must lie in [0, max_classes); sources with more classes are refused")
    # ---- run policy (not fingerprinted) ----
    max_unreadable_share: float = Field(
        0.1, ge=0.0, le=1.0,
        description="a preparation fails, listing them, when more of the source's files or rows "
        "than this share cannot be used")
    source_fingerprint: FingerprintMode = Field(
        "auto", description="how the source's identity (the up-to-date check) is computed")
    content_fingerprint_max_bytes: int = Field(
        4 * GIB, ge=0, description="source_fingerprint=auto hashes the content of sources up to this size")
    max_source_row_group_bytes: int = Field(
        256 << 20, ge=1, description="Parquet sources whose row groups hold more bytes (uncompressed) "
        "in the columns read are refused; batches are sized to decode within about this much memory")

    @model_validator(mode="after")
    def _shard_holds_whole_row_groups(self) -> PrepareParameters:
        if self.rows_per_shard < self.rows_per_row_group:
            raise ValueError(
                f"rows_per_shard ({self.rows_per_shard}) must be >= rows_per_row_group "
                f"({self.rows_per_row_group})"
            )
        return self

    def content_parameters(self) -> dict[str, object]:
        """The fingerprinted fields (everything but the run policy)."""
        return self.model_dump(mode="json", exclude=set(self.RUN_POLICY_FIELDS))


class PrepareConfig(PrepareParameters):
    """A preparation job: which source, where the dataset goes (file://, s3://, gs:// or a local
    path), and the parameters."""

    source: str = Field("digits", min_length=1,
                        description="'digits' or a local image folder / .npy / .npz / .parquet path")
    output: str = Field(min_length=1, description="dataset directory: local path or pyarrow URI")

    def parameters(self) -> PrepareParameters:
        return PrepareParameters(**self.model_dump(exclude={"source", "output"}))
