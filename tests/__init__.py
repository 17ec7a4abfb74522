"""The twistvpn test suite, run with Trial."""
