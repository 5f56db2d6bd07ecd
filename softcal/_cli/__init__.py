"""The ``softcal`` command's parts: one module per command (``calibrate``, ``evaluate``,
``apply``), each with ``add_parser(subparsers)`` and ``run(args) -> exit status``; ``common`` holds
what they share (options, devices, temperatures, files read and written), ``report`` the tables.
:mod:`softcal.cli` assembles them and maps errors to exit statuses.
"""
