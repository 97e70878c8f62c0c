"""Command-line entry points above the library: `fedbot` (cli/main.py) and its fleet dry run
`fedbot sim` (cli/fleet.py). They may use agent/ and coordinator/; nothing below imports them."""
