"""Micro-Manager (pymmcore-plus) to the liveomics daemon over zenoh, and the daemon's follow-up
requests back into the running acquisition."""

from .bridge import Bridge, FollowupLimits, frame_key, well_and_field
from .session import DEFAULT_ENDPOINT, SessionConfigError, session_config

__all__ = ["Bridge", "DEFAULT_ENDPOINT", "FollowupLimits", "SessionConfigError", "frame_key", "session_config", "well_and_field"]
