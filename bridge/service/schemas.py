"""The request and answer bodies of the HTTP API (pydantic models, in the OpenAPI schema at /docs)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from bridge.project_config import OUTPUTS
from bridge.qupath_geojson import scan_coordinates
from bridge.service.messages import clipped, quoted
from inference import MPP_PLAUSIBLE_RANGE

# What a job's roi must be, and the fix, for every way it can fail to be one.
ROI_EXPECTED = (
    "roi must be a GeoJSON Polygon or MultiPolygon geometry: send the annotation's outline as QuPath gives it, or "
    "omit roi to analyse the whole tissue"
)

# Bounds on where an uploaded region sits and how it was scaled: QuPath's images are at most 2^31 px a side,
# a region sent at a coarser downsample than the largest holds nothing a model can use, and one below the smallest
# (QuPath reads regions at 1 or more) is no read of an image: 1e-300 made the grid padding NaN (origin / downsample
# overflowed) and the results' vertices 1e-298 px. Within both, origin / downsample stays finite.
MAX_COORDINATE_PX = 2.0**31
MIN_DOWNSAMPLE = 0.01
MAX_DOWNSAMPLE = 4096.0

# QuPath's image types (ImageData.ImageType), as a job on an image path or an upload states them.
ImageType = Literal["BRIGHTFIELD_H_E", "BRIGHTFIELD_H_DAB", "BRIGHTFIELD_OTHER", "FLUORESCENCE", "OTHER", "UNSET"]
IMAGE_TYPE_DESCRIPTION = (
    "QuPath's image type: BRIGHTFIELD_H_E runs the H&E models (segmentation ensemble, SUA, predicted TPS), "
    "BRIGHTFIELD_H_DAB the PD-L1 IHC nuclei ensemble (TPS, CPS); other types are refused. UNSET or omitted: the "
    "stain is told from the image's colour."
)


class JobRequest(BaseModel):
    """An analysis of one image (or of its ROI)."""

    # A misspelt field (``roii``) must not be ignored: the whole slide would be analysed instead of the ROI.
    model_config = ConfigDict(extra="forbid")

    image: str = Field(
        min_length=1,
        description="Image path or file: URI, as QuPath's server reports it.",
        json_schema_extra={"pattern": "^[^\\u0000]+$"},  # what _image_has_no_nul checks, for clients and fuzzers
    )
    roi: dict[str, Any] | None = Field(
        default=None,
        description="GeoJSON Polygon/MultiPolygon in level-0 px; omit for the whole tissue.",
        json_schema_extra={
            "required": ["type", "coordinates"],
            "properties": {"type": {"enum": ["Polygon", "MultiPolygon"]}, "coordinates": {"type": "array"}},
        },
    )
    mpp: float | None = Field(
        default=None,
        ge=MPP_PLAUSIBLE_RANGE[0],
        le=MPP_PLAUSIBLE_RANGE[1],
        allow_inf_nan=False,
        description="Microns per pixel QuPath reports.",
    )
    image_size_px: tuple[PositiveInt, PositiveInt] | None = Field(
        default=None,
        description="Width and height at which QuPath shows the image; an image file that opens at another "
        "size (another scene of a multi-image file, a cropped view) is refused, since the ROI and the results "
        "would not line up.",
    )
    image_type: ImageType | None = Field(default=None, description=IMAGE_TYPE_DESCRIPTION)
    outputs: list[Literal["regions", "uncertainty_tiles", "sua", "nuclei"]] = Field(default=list(OUTPUTS))
    model: str = Field(default="default", description="Model set; only 'default' (the loaded models) for now.")

    @field_validator("image")
    @classmethod
    def _image_has_no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError(
                f"image path {quoted(value)} cannot be used: it holds a NUL byte, which no file system takes in a "
                "name; send the path (or file: URI) of an image file under an --allow-root folder"
            )
        return value

    @field_validator("outputs")
    @classmethod
    def _outputs_are_not_empty(cls, value: list[str]) -> list[str]:
        # An empty list ran a job that returned no objects, and pdl1_analyze.groovy then removed the earlier
        # results and put none in their place.
        if not value:
            raise ValueError(
                f"outputs is empty, so the job would return no objects; send some of {', '.join(OUTPUTS)}, "
                "or omit outputs for all of them"
            )
        return value

    @field_validator("mpp", mode="before")
    @classmethod
    def _mpp_is_a_number(cls, value: Any) -> Any:
        # pydantic takes true as 1.0 µm/px, a wrong scale for every result, silently; and "0.5" as 0.5, where a
        # client that sends text has another number wrong as likely.
        if isinstance(value, bool | str):
            raise ValueError(
                f"mpp must be a number (the image's µm/px, e.g. 0.25), got {clipped(json.dumps(value))}; send the "
                "pixel size QuPath reports as a JSON number, or omit mpp to use the file's"
            )
        return value

    @field_validator("image_size_px", mode="before")
    @classmethod
    def _image_size_is_numbers(cls, value: Any) -> Any:
        # pydantic takes ["2048", "2048"] as whole numbers, and true as 1.
        if isinstance(value, list | tuple) and any(isinstance(v, bool | str) for v in value):
            raise ValueError(
                f"image_size_px must be two whole JSON numbers (width, height in px), got "
                f"{clipped(json.dumps(value))}; send the size QuPath shows the image at"
            )
        return value

    @field_validator("roi")
    @classmethod
    def _roi_is_geometry(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") not in ("Polygon", "MultiPolygon"):
            given = value.get("type")
            shown = quoted(given) if isinstance(given, str) else clipped(json.dumps(given))
            came = "no type" if given is None else f"type {shown}"
            feature = " (of a GeoJSON Feature, send its geometry)" if given == "Feature" else ""
            raise ValueError(f"{ROI_EXPECTED}; got {came}{feature}")
        if value is not None:
            scan = scan_coordinates(value.get("coordinates"))
            if scan.non_finite is not None:
                raise ValueError(
                    f"roi coordinates must be finite numbers, got {json.dumps(scan.non_finite)}; send the ROI's "
                    "vertices in level-0 px"
                )
        return value


class ErrorDetail(BaseModel):
    """What every error answer carries: what was expected, what came, and the fix."""

    detail: str
    cannot_open: bool | None = Field(
        default=None,
        description="True where POST /v1/jobs refuses the image because the service cannot open it, or not as "
        "the client shows it (not found on its machine, outside --allow-root, a path it cannot use: relative, a "
        "folder, too long; a format no reader here opens, another size than image_size_px): send the region's "
        "pixels to POST /v1/jobs/pixels instead.",
    )


class JobAccepted(BaseModel):
    job_id: str
    state: str
    status_url: str
    result_url: str


class JobStatus(BaseModel):
    job_id: str
    state: Literal["queued", "running", "done", "failed", "cancelling", "cancelled"]
    progress: float = Field(description="The share of its tiles analysed, 0 to 1.")
    tiles_done: int
    tiles_total: int
    error: str | None = None
    image: str = Field(
        description="The image's path as the request sent it (a file: URI as its path), not as the service "
        "resolved it; 'upload' for a pixel upload."
    )
    created: float = Field(description="When it was submitted, in seconds since 1970-01-01 UTC (Unix time).")
    started: float | None = Field(default=None, description="When its analysis started (Unix time); null while queued.")
    finished: float | None = Field(default=None, description="When it ended (Unix time); null until then.")


class ModelDescription(BaseModel):
    task: str
    name: str
    version: str
    sha256: str
    members: int
    input_mpp: float = Field(description="The µm/px it analyses at (images are read at this resolution).")
    tile_size_px: int = Field(
        description="The edge of the tiles it runs on, in its input px (input_mpp µm each): a tile over a region's "
        "edge sees that far around it, so a pixel upload carries that much of the tissue around its ROI as context."
    )
    stain: str = Field(description="The stain it was trained on and runs on: H&E, or H-DAB (PD-L1 IHC).")


class UploadLimits(BaseModel):
    """What POST /v1/jobs/pixels takes, so a client can tell before it renders or sends a region."""

    max_px: int = Field(description="The most pixels (width x height) an uploaded region may have.")
    max_bytes: int = Field(description="The most bytes an upload's body may have.")


class Health(BaseModel):
    status: str
    version: str
    device: str
    models: list[ModelDescription]
    upload_limits: UploadLimits
