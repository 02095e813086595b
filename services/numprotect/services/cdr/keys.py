"""The CDR key layout lives in numprotect.core.cdr_keys (shared with the invariant checker, numprotect.core.doctor);
the service's modules and tests keep importing it from here."""

from numprotect.core.cdr_keys import UNMATCHED_TAG, Bucket

__all__ = ["UNMATCHED_TAG", "Bucket"]
