"""Generated from proto/ by scripts/gen-proto.sh. Do not edit."""
