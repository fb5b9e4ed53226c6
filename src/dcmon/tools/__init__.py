"""The bench and maintenance commands, one module per command group, each with its own ``add_commands``
(listed in ``dcmon.cli.COMMAND_MODULES``):

    target     the shared layer: Target, resolve, say, note, the format helpers, handler
    scan       scan, set-address
    meter      read, watch, shunt get|set, reset-energy
    calibrate  calibrate, check-accuracy
    spool      spool (status, export, quarantine)
    grafana    grafana-import

This package imports nothing itself, so ``dcmon spool`` does not load pymodbus or httpx.
"""
