"""The control plane: public API, auth, teams, scheduling."""
