"""operations/doctor"""
