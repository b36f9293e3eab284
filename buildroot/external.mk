include $(sort $(wildcard $(BR2_EXTERNAL_SECTA_PATH)/package/*/*.mk))
