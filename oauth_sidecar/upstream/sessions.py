"""Where SessionBindings used to live: it moved to auth/sessions.py, because whether a caller may
use a session is the gate's decision. Kept only so the doctor's import keeps working until it
imports from auth.sessions; delete it then.
"""

from oauth_sidecar.auth.sessions import SessionBindings

__all__ = ["SessionBindings"]
