"""Python clients of a Potboiler node, beyond the generated stubs in `potboiler.v1`."""
