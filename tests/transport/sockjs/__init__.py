"""Tests of the SockJS transport (gateway.transport.sockjs)."""
