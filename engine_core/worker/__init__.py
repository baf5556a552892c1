"""engine_core.worker"""
