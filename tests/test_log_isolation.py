"""The suite's own isolation (tests/conftest.py): a logging handler made while one test captured stderr must not
break the logging of the tests after it on the same worker (CI found a Prefect flow test failing that way, with a
recursion, after the files were redistributed over the workers). The two tests run in this order (loadfile)."""

import logging


def _on_closed_streams() -> list[tuple[str, str]]:
    loggers = [logging.getLogger(), *(obj for obj in logging.Logger.manager.loggerDict.values() if isinstance(obj, logging.Logger))]
    return [(logger.name, type(h).__name__) for logger in loggers for h in logger.handlers
            if getattr(getattr(h, "stream", None), "closed", False)]


def test_prefect_configures_its_handlers_while_stderr_is_captured(capsys):
    from prefect.logging.configuration import setup_logging

    setup_logging()
    assert logging.getLogger().handlers  # Prefect's console handler on the root logger, on capsys's stream


def test_no_handler_is_left_on_the_closed_stream():
    """Negative control, measured: without conftest's ``_log_handlers_on_open_streams`` this lists the root, uvicorn
    and fastapi console handlers and prefect._internal's stream handler."""
    assert not _on_closed_streams()
    logging.getLogger("prefect.flow_runs").warning("a record after the capturing test")  # would print a logging error
