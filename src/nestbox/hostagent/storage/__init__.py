"""Capsule and template storage: qcow2 overlays (`cow`) and the template directory (`templates`)."""
