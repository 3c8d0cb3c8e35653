"""`iotflow deadletters|replay` (iotflow.remote): what a person reads when the API says no."""

from __future__ import annotations

from iotflow.api.errors import ApiError, invalid
from iotflow.errors import Problem
from iotflow.remote import describe_error


def body(error: ApiError) -> str:
    response = error.response()
    assert isinstance(response.body, bytes)
    return response.body.decode()


def test_the_apis_error_body_is_read_out_with_its_fields() -> None:
    error = invalid([Problem("from", "not a time"), Problem("devEUIs.0", "not a DevEUI")], "replay")
    assert describe_error(422, body(error)).splitlines() == [
        "error: The replay is invalid (2 problems). (HTTP 422 validation_failed)",
        "  from: not a time",
        "  devEUIs.0: not a DevEUI",
    ]


def test_an_error_without_details_is_one_line() -> None:
    error = ApiError(403, "forbidden", "This token's role (reader) may not do this.")
    assert describe_error(403, body(error)) == (
        "error: This token's role (reader) may not do this. (HTTP 403 forbidden)"
    )


def test_a_body_that_is_not_the_apis_is_shown_as_it_came() -> None:
    assert describe_error(502, "<html>Bad Gateway</html>") == "HTTP 502: <html>Bad Gateway</html>"
    assert describe_error(500, '["not", "an object"]') == 'HTTP 500: ["not", "an object"]'
    assert describe_error(503, "") == "HTTP 503:"
