"""Browser tests: the chat page in Chromium against the local cluster behind nginx."""
