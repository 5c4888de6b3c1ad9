"""FHIR lane: study headers → an R4 ImagingStudy, kept current per study by conditional update.

``ImagingStudyHandler`` is the pure, versioned mapping; ``FhirStudySender`` the sink node that
aggregates a study's instances, debounces, reads the server's current resource, merges ours
over it (``merge_study``, pure) and ``PUT``s
``{url}/ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>``; ``FhirConfig`` its ``[fhir]``
table; ``parse_operation_outcome`` the routing-safe reading of a server's error body. See
docs/fhir.md for the mapping table, keys and the debounce behaviour.
"""

from .aggregate import StudyAggregator
from .imagingstudy import ImagingStudyHandler, MappingError
from .merge import merge_study
from .response import SearchError, classify_fhir, parse_operation_outcome, search_match
from .sender import FhirConfig, FhirStudySender, build_resource, study_query

__all__ = ["FhirConfig", "FhirStudySender", "ImagingStudyHandler", "MappingError",
           "SearchError", "StudyAggregator", "build_resource", "classify_fhir", "merge_study",
           "parse_operation_outcome", "search_match", "study_query"]
