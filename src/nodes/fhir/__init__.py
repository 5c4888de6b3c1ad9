"""FHIR lane: study headers → an R4 ImagingStudy, kept current per study by conditional update.

``ImagingStudyHandler`` is the pure, versioned mapping; ``FhirStudySender`` the sink node that
aggregates a study's instances, debounces, and ``PUT``s
``{url}/ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>``; ``FhirConfig`` its ``[fhir]``
table; ``parse_operation_outcome`` the routing-safe reading of a server's error body. See
docs/fhir.md for the mapping table, keys and the debounce behaviour.
"""

from .aggregate import StudyAggregator
from .imagingstudy import ImagingStudyHandler, MappingError
from .response import classify_fhir, parse_operation_outcome
from .sender import FhirConfig, FhirStudySender, build_resource, study_query

__all__ = ["FhirConfig", "FhirStudySender", "ImagingStudyHandler", "MappingError",
           "StudyAggregator", "build_resource", "classify_fhir", "parse_operation_outcome",
           "study_query"]
