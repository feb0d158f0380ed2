"""Settings of the fleet commands, declared once (env prefix EDGEKIT_); the CLI flags fall back to these."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class FleetSettings(BaseSettings):
    """How a board talks to its registry and keeps its versions."""

    model_config = SettingsConfigDict(env_prefix="EDGEKIT_", extra="ignore")

    trusted_key: Path | None = Field(
        None, description="Ed25519 public key (PEM); when set, pull and update refuse artifacts it did not sign (env EDGEKIT_TRUSTED_KEY).")
    plain_http: bool = Field(False, description="Talk HTTP instead of HTTPS to the registry (env EDGEKIT_PLAIN_HTTP).")
    keep_versions: int = Field(3, ge=2, le=100, description="Versions of each model `edgekit update` keeps on the board, current included.")
    device: str | None = Field(None, description="This board's device id or profile file for update's fit gate (env EDGEKIT_DEVICE).")
    docker_config: Path | None = Field(
        None, description="Registry credentials file (Docker's config.json); default $DOCKER_CONFIG/config.json, else ~/.docker/config.json.")
    daemon_url: str | None = Field(
        None, description="The running daemon (e.g. http://127.0.0.1:8080): `edgekit update` leaves the golden checks to "
        "its reload and switches back unless it serves the new version through the probation window (env EDGEKIT_DAEMON_URL).")
    confirm_timeout_s: float = Field(
        600.0, gt=0, description="How long `edgekit update --daemon` waits for the daemon to serve (or refuse) the new version.")
    probation_s: float = Field(
        30.0, ge=0, description="How long the daemon must keep serving the new version without failing before the switch stays.")
