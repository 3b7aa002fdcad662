from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_IDLE: _ClassVar[NodeState]
    NODE_STATE_TRAINING: _ClassVar[NodeState]
    NODE_STATE_UPLOADING: _ClassVar[NodeState]
    NODE_STATE_WAITING: _ClassVar[NodeState]
    NODE_STATE_FAILED: _ClassVar[NodeState]

class UpdateStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_STATUS_UNSPECIFIED: _ClassVar[UpdateStatus]
    UPDATE_STATUS_ACCEPTED: _ClassVar[UpdateStatus]
    UPDATE_STATUS_REJECTED: _ClassVar[UpdateStatus]
    UPDATE_STATUS_PENDING: _ClassVar[UpdateStatus]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_IDLE: NodeState
NODE_STATE_TRAINING: NodeState
NODE_STATE_UPLOADING: NodeState
NODE_STATE_WAITING: NodeState
NODE_STATE_FAILED: NodeState
UPDATE_STATUS_UNSPECIFIED: UpdateStatus
UPDATE_STATUS_ACCEPTED: UpdateStatus
UPDATE_STATUS_REJECTED: UpdateStatus
UPDATE_STATUS_PENDING: UpdateStatus

class Envelope(_message.Message):
    __slots__ = ("kind", "job", "round", "sender", "timestamp_ms", "nonce", "payload", "payload_sha256", "signature")
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    job: str
    round: int
    sender: bytes
    timestamp_ms: int
    nonce: bytes
    payload: bytes
    payload_sha256: bytes
    signature: bytes
    def __init__(self, kind: _Optional[str] = ..., job: _Optional[str] = ..., round: _Optional[int] = ..., sender: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., payload_sha256: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("accelerator", "gpu_type", "gpu_count", "gpu_memory_bytes", "host_memory_bytes", "cpu_count", "software_version")
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    GPU_TYPE_FIELD_NUMBER: _ClassVar[int]
    GPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    accelerator: str
    gpu_type: str
    gpu_count: int
    gpu_memory_bytes: int
    host_memory_bytes: int
    cpu_count: int
    software_version: str
    def __init__(self, accelerator: _Optional[str] = ..., gpu_type: _Optional[str] = ..., gpu_count: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ..., host_memory_bytes: _Optional[int] = ..., cpu_count: _Optional[int] = ..., software_version: _Optional[str] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("token", "pool", "name", "capabilities", "csr_pem", "data_address")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    token: str
    pool: str
    name: str
    capabilities: Capabilities
    csr_pem: bytes
    data_address: str
    def __init__(self, token: _Optional[str] = ..., pool: _Optional[str] = ..., name: _Optional[str] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., csr_pem: _Optional[bytes] = ..., data_address: _Optional[str] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("node_id", "certificate_pem", "ca_certificate_pem", "coordinator_public_key", "heartbeat_interval_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    certificate_pem: bytes
    ca_certificate_pem: bytes
    coordinator_public_key: bytes
    heartbeat_interval_ms: int
    def __init__(self, node_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., ca_certificate_pem: _Optional[bytes] = ..., coordinator_public_key: _Optional[bytes] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("state", "step", "loss", "tokens_per_second", "detail", "round", "weights_digest", "epoch")
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    state: NodeState
    step: int
    loss: float
    tokens_per_second: float
    detail: str
    round: int
    weights_digest: str
    epoch: int
    def __init__(self, state: _Optional[_Union[NodeState, str]] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., detail: _Optional[str] = ..., round: _Optional[int] = ..., weights_digest: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("server_time_ms", "assignment_changed", "evicted", "message")
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_CHANGED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    server_time_ms: int
    assignment_changed: bool
    evicted: bool
    message: str
    def __init__(self, server_time_ms: _Optional[int] = ..., assignment_changed: _Optional[bool] = ..., evicted: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class GetAssignmentRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DistributedWorld(_message.Message):
    __slots__ = ("rank", "world_size", "master_address", "master_port", "backend", "timeout_s")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    master_address: str
    master_port: int
    backend: str
    timeout_s: int
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ..., master_address: _Optional[str] = ..., master_port: _Optional[int] = ..., backend: _Optional[str] = ..., timeout_s: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("job", "round", "pool", "stage", "num_stages", "layer_start", "layer_end", "world", "dataset_cid", "shard_cids", "start_weights_cid", "inner_steps", "compression", "deadline_ms", "standby", "model_config_json", "seed", "epoch", "job_spec_json", "coordinator_public_key")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    WORLD_FIELD_NUMBER: _ClassVar[int]
    DATASET_CID_FIELD_NUMBER: _ClassVar[int]
    SHARD_CIDS_FIELD_NUMBER: _ClassVar[int]
    START_WEIGHTS_CID_FIELD_NUMBER: _ClassVar[int]
    INNER_STEPS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    STANDBY_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    JOB_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    pool: str
    stage: int
    num_stages: int
    layer_start: int
    layer_end: int
    world: DistributedWorld
    dataset_cid: str
    shard_cids: _containers.RepeatedScalarFieldContainer[str]
    start_weights_cid: str
    inner_steps: int
    compression: str
    deadline_ms: int
    standby: bool
    model_config_json: str
    seed: int
    epoch: int
    job_spec_json: str
    coordinator_public_key: bytes
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., pool: _Optional[str] = ..., stage: _Optional[int] = ..., num_stages: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., world: _Optional[_Union[DistributedWorld, _Mapping]] = ..., dataset_cid: _Optional[str] = ..., shard_cids: _Optional[_Iterable[str]] = ..., start_weights_cid: _Optional[str] = ..., inner_steps: _Optional[int] = ..., compression: _Optional[str] = ..., deadline_ms: _Optional[int] = ..., standby: _Optional[bool] = ..., model_config_json: _Optional[str] = ..., seed: _Optional[int] = ..., epoch: _Optional[int] = ..., job_spec_json: _Optional[str] = ..., coordinator_public_key: _Optional[bytes] = ...) -> None: ...

class GetAssignmentReply(_message.Message):
    __slots__ = ("has_assignment", "assignment", "reason", "retry_after_ms")
    HAS_ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    has_assignment: bool
    assignment: Assignment
    reason: str
    retry_after_ms: int
    def __init__(self, has_assignment: _Optional[bool] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ..., reason: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("pool", "stage", "blob_cid", "blob_sha256", "blob_bytes", "base_weights_cid", "compression", "tokens", "loss", "norm")
    POOL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    BLOB_CID_FIELD_NUMBER: _ClassVar[int]
    BLOB_SHA256_FIELD_NUMBER: _ClassVar[int]
    BLOB_BYTES_FIELD_NUMBER: _ClassVar[int]
    BASE_WEIGHTS_CID_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    pool: str
    stage: int
    blob_cid: str
    blob_sha256: bytes
    blob_bytes: int
    base_weights_cid: str
    compression: str
    tokens: int
    loss: float
    norm: float
    def __init__(self, pool: _Optional[str] = ..., stage: _Optional[int] = ..., blob_cid: _Optional[str] = ..., blob_sha256: _Optional[bytes] = ..., blob_bytes: _Optional[int] = ..., base_weights_cid: _Optional[str] = ..., compression: _Optional[str] = ..., tokens: _Optional[int] = ..., loss: _Optional[float] = ..., norm: _Optional[float] = ...) -> None: ...

class SubmitUpdateReply(_message.Message):
    __slots__ = ("status", "reason", "update_id")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    status: UpdateStatus
    reason: str
    update_id: str
    def __init__(self, status: _Optional[_Union[UpdateStatus, str]] = ..., reason: _Optional[str] = ..., update_id: _Optional[str] = ...) -> None: ...

class GetRoundResultRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageResult(_message.Message):
    __slots__ = ("stage", "weights_cid", "accepted_update_ids", "rejected", "start_weights_cid", "start_momentum_cid", "momentum_cid", "input_envelope_cids", "notes", "scores")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_CID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_UPDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    START_WEIGHTS_CID_FIELD_NUMBER: _ClassVar[int]
    START_MOMENTUM_CID_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_CID_FIELD_NUMBER: _ClassVar[int]
    INPUT_ENVELOPE_CIDS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    stage: int
    weights_cid: str
    accepted_update_ids: _containers.RepeatedScalarFieldContainer[str]
    rejected: _containers.RepeatedCompositeFieldContainer[RejectedUpdate]
    start_weights_cid: str
    start_momentum_cid: str
    momentum_cid: str
    input_envelope_cids: _containers.RepeatedScalarFieldContainer[str]
    notes: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedCompositeFieldContainer[UpdateScore]
    def __init__(self, stage: _Optional[int] = ..., weights_cid: _Optional[str] = ..., accepted_update_ids: _Optional[_Iterable[str]] = ..., rejected: _Optional[_Iterable[_Union[RejectedUpdate, _Mapping]]] = ..., start_weights_cid: _Optional[str] = ..., start_momentum_cid: _Optional[str] = ..., momentum_cid: _Optional[str] = ..., input_envelope_cids: _Optional[_Iterable[str]] = ..., notes: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[_Union[UpdateScore, _Mapping]]] = ...) -> None: ...

class UpdateScore(_message.Message):
    __slots__ = ("update_id", "node_id", "pool", "accepted", "norm", "distance", "cosine", "norm_ratio", "distance_ratio", "spread_alignment", "spread_shift", "spread_z", "row_ratio", "row", "krum_score", "absent_row_ratio", "absent_row")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    NORM_RATIO_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_RATIO_FIELD_NUMBER: _ClassVar[int]
    SPREAD_ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    SPREAD_SHIFT_FIELD_NUMBER: _ClassVar[int]
    SPREAD_Z_FIELD_NUMBER: _ClassVar[int]
    ROW_RATIO_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    KRUM_SCORE_FIELD_NUMBER: _ClassVar[int]
    ABSENT_ROW_RATIO_FIELD_NUMBER: _ClassVar[int]
    ABSENT_ROW_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    node_id: str
    pool: str
    accepted: bool
    norm: float
    distance: float
    cosine: float
    norm_ratio: float
    distance_ratio: float
    spread_alignment: float
    spread_shift: float
    spread_z: float
    row_ratio: float
    row: str
    krum_score: float
    absent_row_ratio: float
    absent_row: str
    def __init__(self, update_id: _Optional[str] = ..., node_id: _Optional[str] = ..., pool: _Optional[str] = ..., accepted: _Optional[bool] = ..., norm: _Optional[float] = ..., distance: _Optional[float] = ..., cosine: _Optional[float] = ..., norm_ratio: _Optional[float] = ..., distance_ratio: _Optional[float] = ..., spread_alignment: _Optional[float] = ..., spread_shift: _Optional[float] = ..., spread_z: _Optional[float] = ..., row_ratio: _Optional[float] = ..., row: _Optional[str] = ..., krum_score: _Optional[float] = ..., absent_row_ratio: _Optional[float] = ..., absent_row: _Optional[str] = ...) -> None: ...

class RejectedUpdate(_message.Message):
    __slots__ = ("update_id", "node_id", "pool", "stage", "reason")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    node_id: str
    pool: str
    stage: int
    reason: str
    def __init__(self, update_id: _Optional[str] = ..., node_id: _Optional[str] = ..., pool: _Optional[str] = ..., stage: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RoundResult(_message.Message):
    __slots__ = ("job", "round", "aggregation_rule", "stages", "pools", "checkpoint_cid", "mean_loss", "tokens", "pool_shards", "input_envelopes_cid")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_RULE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_CID_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    POOL_SHARDS_FIELD_NUMBER: _ClassVar[int]
    INPUT_ENVELOPES_CID_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    aggregation_rule: str
    stages: _containers.RepeatedCompositeFieldContainer[StageResult]
    pools: _containers.RepeatedScalarFieldContainer[str]
    checkpoint_cid: str
    mean_loss: float
    tokens: int
    pool_shards: _containers.RepeatedCompositeFieldContainer[PoolShards]
    input_envelopes_cid: str
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., aggregation_rule: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageResult, _Mapping]]] = ..., pools: _Optional[_Iterable[str]] = ..., checkpoint_cid: _Optional[str] = ..., mean_loss: _Optional[float] = ..., tokens: _Optional[int] = ..., pool_shards: _Optional[_Iterable[_Union[PoolShards, _Mapping]]] = ..., input_envelopes_cid: _Optional[str] = ...) -> None: ...

class EnvelopeBundle(_message.Message):
    __slots__ = ("envelopes",)
    ENVELOPES_FIELD_NUMBER: _ClassVar[int]
    envelopes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, envelopes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PoolShards(_message.Message):
    __slots__ = ("pool", "shard_cids")
    POOL_FIELD_NUMBER: _ClassVar[int]
    SHARD_CIDS_FIELD_NUMBER: _ClassVar[int]
    pool: str
    shard_cids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pool: _Optional[str] = ..., shard_cids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetRoundResultReply(_message.Message):
    __slots__ = ("ready", "result", "result_cid", "retry_after_ms")
    READY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RESULT_CID_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    result: Envelope
    result_cid: str
    retry_after_ms: int
    def __init__(self, ready: _Optional[bool] = ..., result: _Optional[_Union[Envelope, _Mapping]] = ..., result_cid: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("stage", "node_id", "state", "step", "loss", "tokens_per_second")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    stage: int
    node_id: str
    state: NodeState
    step: int
    loss: float
    tokens_per_second: float
    def __init__(self, stage: _Optional[int] = ..., node_id: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class PoolStatus(_message.Message):
    __slots__ = ("pool", "state", "detail", "stages", "standby_nodes")
    POOL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    STANDBY_NODES_FIELD_NUMBER: _ClassVar[int]
    pool: str
    state: str
    detail: str
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    standby_nodes: int
    def __init__(self, pool: _Optional[str] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ..., standby_nodes: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("job", "job_state", "round", "pools", "loss", "tokens_per_second", "updates_accepted", "updates_rejected", "server_time_ms")
    JOB_FIELD_NUMBER: _ClassVar[int]
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    UPDATES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    job: str
    job_state: str
    round: int
    pools: _containers.RepeatedCompositeFieldContainer[PoolStatus]
    loss: float
    tokens_per_second: float
    updates_accepted: int
    updates_rejected: int
    server_time_ms: int
    def __init__(self, job: _Optional[str] = ..., job_state: _Optional[str] = ..., round: _Optional[int] = ..., pools: _Optional[_Iterable[_Union[PoolStatus, _Mapping]]] = ..., loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., updates_accepted: _Optional[int] = ..., updates_rejected: _Optional[int] = ..., server_time_ms: _Optional[int] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "name", "pool", "state", "last_heartbeat_ms", "has_stage", "stage", "capabilities", "public_key")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    HAS_STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    pool: str
    state: str
    last_heartbeat_ms: int
    has_stage: bool
    stage: int
    capabilities: Capabilities
    public_key: bytes
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., pool: _Optional[str] = ..., state: _Optional[str] = ..., last_heartbeat_ms: _Optional[int] = ..., has_stage: _Optional[bool] = ..., stage: _Optional[int] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class ListNodesReply(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class CreateEnrollmentTokenRequest(_message.Message):
    __slots__ = ("pool", "ttl_seconds")
    POOL_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    pool: str
    ttl_seconds: int
    def __init__(self, pool: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CreateEnrollmentTokenReply(_message.Message):
    __slots__ = ("token", "expires_at_ms")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at_ms: int
    def __init__(self, token: _Optional[str] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec_yaml",)
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    spec_yaml: str
    def __init__(self, spec_yaml: _Optional[str] = ...) -> None: ...

class SubmitJobReply(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class PlacementEntry(_message.Message):
    __slots__ = ("pool", "stage", "node_id", "layer_start", "layer_end", "reason")
    POOL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    pool: str
    stage: int
    node_id: str
    layer_start: int
    layer_end: int
    reason: str
    def __init__(self, pool: _Optional[str] = ..., stage: _Optional[int] = ..., node_id: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class GetJobReply(_message.Message):
    __slots__ = ("job", "state", "spec_yaml", "round", "placement", "shards_by_pool")
    class ShardsByPoolEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOB_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_BY_POOL_FIELD_NUMBER: _ClassVar[int]
    job: str
    state: str
    spec_yaml: str
    round: int
    placement: _containers.RepeatedCompositeFieldContainer[PlacementEntry]
    shards_by_pool: _containers.ScalarMap[str, str]
    def __init__(self, job: _Optional[str] = ..., state: _Optional[str] = ..., spec_yaml: _Optional[str] = ..., round: _Optional[int] = ..., placement: _Optional[_Iterable[_Union[PlacementEntry, _Mapping]]] = ..., shards_by_pool: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("job", "limit")
    JOB_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    job: str
    limit: int
    def __init__(self, job: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round", "state", "opened_ms", "closed_ms", "updates_accepted", "updates_rejected", "mean_loss", "result_cid", "detail")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OPENED_MS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    RESULT_CID_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    opened_ms: int
    closed_ms: int
    updates_accepted: int
    updates_rejected: int
    mean_loss: float
    result_cid: str
    detail: str
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., opened_ms: _Optional[int] = ..., closed_ms: _Optional[int] = ..., updates_accepted: _Optional[int] = ..., updates_rejected: _Optional[int] = ..., mean_loss: _Optional[float] = ..., result_cid: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ListRoundsReply(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundInfo]
    def __init__(self, rounds: _Optional[_Iterable[_Union[RoundInfo, _Mapping]]] = ...) -> None: ...

class EvictNodeRequest(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class EvictNodeReply(_message.Message):
    __slots__ = ("evicted",)
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    evicted: bool
    def __init__(self, evicted: _Optional[bool] = ...) -> None: ...

class ReadmitNodeRequest(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReadmitNodeReply(_message.Message):
    __slots__ = ("readmitted",)
    READMITTED_FIELD_NUMBER: _ClassVar[int]
    readmitted: bool
    def __init__(self, readmitted: _Optional[bool] = ...) -> None: ...

class RelayCall(_message.Message):
    __slots__ = ("id", "method", "client_cn", "peer", "timeout_ms", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CN_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: int
    method: str
    client_cn: str
    peer: str
    timeout_ms: int
    request: bytes
    def __init__(self, id: _Optional[int] = ..., method: _Optional[str] = ..., client_cn: _Optional[str] = ..., peer: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., request: _Optional[bytes] = ...) -> None: ...

class RelayReply(_message.Message):
    __slots__ = ("id", "code", "details", "reply")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    id: int
    code: int
    details: str
    reply: bytes
    def __init__(self, id: _Optional[int] = ..., code: _Optional[int] = ..., details: _Optional[str] = ..., reply: _Optional[bytes] = ...) -> None: ...
