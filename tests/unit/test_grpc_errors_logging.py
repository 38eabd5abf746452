"""grpc.aio's report of a stream whose client went away is kept out of the node's log at INFO."""

from __future__ import annotations

import logging
import sys

import pytest

from potboiler.server.grpc_errors import quiet_client_gone

GRPC_LOGGER = "grpc._cython.cygrpc"


def report_client_gone() -> None:
    """Log what grpc.aio logs when a message of a server stream cannot be sent to a gone client."""
    try:
        raise RuntimeError('Failed "execute_batch": (<SendMessageOperation>,)')
    except RuntimeError:
        logging.getLogger(GRPC_LOGGER).error(
            "ExecuteBatchError raised in core by servicer method [/potboiler.v1.LogService/SubscribeEntries]",
            exc_info=sys.exc_info(),
        )


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_a_client_gone_is_one_debug_line_and_other_grpc_errors_stay(
    level: int, caplog: pytest.LogCaptureFixture
) -> None:
    quiet_client_gone()
    quiet_client_gone()  # installed once however often it is called
    logger = logging.getLogger(GRPC_LOGGER)
    assert len(logger.filters) == 1
    caplog.set_level(level, logger=GRPC_LOGGER)
    report_client_gone()
    logger.error("Unexpected [AttributeError] raised by servicer method")
    records = [(r.levelname, r.getMessage().split(" [")[0], r.exc_info) for r in caplog.records]
    gone = [("DEBUG", "ExecuteBatchError raised in core by servicer method", None)]
    assert records == [*(gone if level == logging.DEBUG else []), ("ERROR", "Unexpected", None)]
