"""engine_core"""
