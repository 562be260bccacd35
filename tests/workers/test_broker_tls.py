"""workers/broker_tls.py: an amqps:// URL's ssl_* parameters become py-amqp's options."""
from __future__ import annotations

import ssl

import pytest

from poolgate.workers.broker_tls import split_amqps
from poolgate.workers.errors import ConfigError


def test_amqps_parameters_become_broker_use_ssl() -> None:
    url, opts = split_amqps("amqps://u:p@mq:5671/vh?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required"
                            "&ssl_certfile=/c.pem&ssl_keyfile=/c.key&heartbeat=30")
    assert url == "amqps://u:p@mq:5671/vh?heartbeat=30"
    assert opts == {"ca_certs": "/ca.pem", "cert_reqs": ssl.CERT_REQUIRED, "certfile": "/c.pem",
                    "keyfile": "/c.key"}
    assert split_amqps("amqps://u:p@mq//?ssl_ca_certs=/ca.pem")[1] == {
        "ca_certs": "/ca.pem", "cert_reqs": ssl.CERT_REQUIRED}  # verified unless said otherwise


@pytest.mark.parametrize("url", ["amqps://u:p@mq//", "amqp://u:p@mq//?ssl_ca_certs=/x",
                                 "rediss://:p@r:6379/0?ssl_cert_reqs=required&ssl_ca_certs=/ca"])
def test_other_urls_are_left_as_they_are(url: str) -> None:
    assert split_amqps(url) == (url, None)


def test_a_bad_cert_reqs_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="expected one of required, optional, none"):
        split_amqps("amqps://u:p@mq//?ssl_cert_reqs=always")
