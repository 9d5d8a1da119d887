"""The nursing-station web console (``pneumoflag station``).

It runs on any machine of the ward network, not necessarily the appliance, and talks to the appliances
only through the MQTT contract (``pneumoflag.device.contract``: topics, messages and their checks), over
the device's MQTT client factory (``pneumoflag.device.mqtt_client``) with its config
(``pneumoflag.device.config``); nothing else of the device package. The device package never imports
this one: its CLI finds ``pneumoflag station`` through the ``pneumoflag.commands`` entry point.
"""
