"""The ``softcal`` command's parts: one module per command (``calibrate``, ``compare``,
``evaluate``, ``apply``), each with ``add_parser(subparsers)`` and ``run(args) -> exit status``;
``common`` holds what they share (options, devices, temperatures, files read and written),
``report`` the tables, ``calibrators`` the calibrators beyond temperature scaling (``calibrate
--method``, ``compare``, a saved calibrator in ``apply``). :mod:`softcal.cli` assembles them and
maps errors to exit statuses.
"""
