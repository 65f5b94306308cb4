"""The test suite. A package, so that its helpers (tests.support) import the same way from tests and benches."""
