"""The HTTP surfaces: one blueprint each (cases: the JSON API; fhir: the FHIR R4 API; health)."""
