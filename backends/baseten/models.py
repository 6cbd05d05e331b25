"""What the Baseten control plane answers, as pydantic models that ignore unknown fields.

Only the fields the client uses are declared (the service adds fields freely). The shapes follow
the published client's usage (``run.*``, ``sampler.*``, ``deployment.status.name``, ...); see the
README's list of what is inferred rather than documented.
"""

from __future__ import annotations

from loops_core.types import Checkpoint, Response

# Trainer deployments (``GET /v1/loops/deployments/{id}`` → ``deployment.status.name``).
TRAINER_TERMINAL = frozenset({"FAILED", "STOPPED", "PREEMPTED"})
# Sampler deployments (``GET /v1/models/{model_id}/deployments/{deployment_id}`` → ``status``).
SAMPLER_TERMINAL = frozenset({"DEPLOY_FAILED", "UNHEALTHY", "BUILD_FAILED", "BUILD_STOPPED", "DEACTIVATING",
                              "INACTIVE", "FAILED"})
SAMPLER_READY = "ACTIVE"
SCALED_TO_ZERO = "SCALED_TO_ZERO"


class SessionRecord(Response):
    id: str
    # Emulator-only extension: capabilities the data plane behind it has beyond the real
    # service's (exact version pinning, determinism). The real service sends no such field.
    features: list[str] = []


class SessionEnvelope(Response):
    session: SessionRecord


class RunRecord(Response):
    id: str
    base_model: str | None = None
    base_url: str | None = None        # null: not routable yet
    deployment_id: str | None = None   # null: a serverless trainer (no deployment to watch)
    base_checkpoint: str | None = None


class RunEnvelope(Response):
    run: RunRecord


class SamplerRecord(Response):
    id: str
    base_url: str | None = None
    model_id: str | None = None        # model_id and deployment_id both null: serverless
    deployment_id: str | None = None
    base_model: str | None = None
    base_checkpoint: str | None = None

    @property
    def dedicated(self) -> bool:
        return bool(self.model_id and self.deployment_id)


class SamplerEnvelope(Response):
    sampler: SamplerRecord


class DeploymentStatusName(Response):
    name: str


class TrainerDeployment(Response):
    id: str | None = None
    status: DeploymentStatusName


class TrainerDeploymentEnvelope(Response):
    deployment: TrainerDeployment


class SamplerDeployment(Response):
    id: str | None = None
    status: str


class CheckpointList(Response):
    checkpoints: list[Checkpoint]
