"""Local stand-ins for Microsoft's services, for ``run --sandbox`` and for the tests.

They enforce the protocol as the real services do (STARTTLS before AUTH, tokens that
expire and are checked), so a relay that works against them works against Microsoft.
"""
