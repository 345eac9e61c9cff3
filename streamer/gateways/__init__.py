"""Gateways between ICU equipment and the topics (docs/gateways.md): monitors in (HL7 v2 PCD-01 over MLLP,
IEEE 11073 SDC), alarm managers out (IHE PCD-04 over MLLP). Each needs the `gateways` extra."""
