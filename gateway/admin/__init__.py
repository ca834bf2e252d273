"""The operator's front door: the admin API, the metrics and the web console, on the admin
listener the runtime serves. It knows the running gateway only as
:class:`~gateway.admin.operations.Operations`."""
