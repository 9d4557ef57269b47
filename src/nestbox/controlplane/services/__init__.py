"""Business rules of the control plane: no HTTP types, no SQL text. Services take what they need
in their constructors and talk to the database only through `Database.transaction()`."""
