"""spool"""
