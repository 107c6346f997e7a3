"""Disks, images and block jobs."""
