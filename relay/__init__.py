"""smtp-oauth-relay: accept mail from legacy SMTP clients and deliver it through Exchange
Online with OAuth 2.0 client-credentials tokens (SASL XOAUTH2)."""

__version__ = "0.1.0"
