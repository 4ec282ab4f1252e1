"""The gateway: client WebSockets in, Redis bus behind, admin and health routes, the browser page."""
