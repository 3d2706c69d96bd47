"""accept"""
