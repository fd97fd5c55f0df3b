"""Local stand-ins for cloud services this machine cannot reach, speaking those services' wire protocols."""
