"""
Applications built on guided_diffusion (not part of the installed package).
"""
