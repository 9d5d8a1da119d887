"""The nursing-station web console (``pneumoflag station``).

It runs on any machine of the ward network, never on the appliance by necessity, and talks to the
appliances only through the MQTT contract (``pneumoflag.device.messages``). The device package never
imports this one.
"""
