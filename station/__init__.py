"""The nursing-station web console (``pneumoflag station``).

It runs on any machine of the ward network, not necessarily the appliance, and talks to the appliances
only over MQTT: the messages of ``pneumoflag.device.messages``, each checked by ``pneumoflag.device.contract``
(it reuses the device's configuration, MQTT client setup and vocabulary too). The device package never
imports this one: its CLI finds ``pneumoflag station`` through the ``pneumoflag.commands`` entry point.
"""
