################################################################################
#
# secta
#
################################################################################

SECTA_VERSION = 0.1.0
# The repository this tree lives in (buildroot/ is one of its folders).
SECTA_SITE = $(BR2_EXTERNAL_SECTA_PATH)/..
SECTA_SITE_METHOD = local
SECTA_LICENSE = AGPL-3.0-or-later
# Build the one binary of the workspace.
SECTA_SUBDIR = firmware/secta

# Local sources are not downloaded, so Buildroot's download-time vendoring does
# not run for them: vendor the crates right after the sources are copied (this
# step needs the network; every later step runs --offline).
define SECTA_CARGO_VENDOR
	cd $(@D) && mkdir -p .cargo && \
		$(HOST_MAKE_ENV) $(PKG_COMMON_CARGO_ENV) \
		cargo vendor --locked --versioned-dirs VENDOR > .cargo/config.toml
endef
SECTA_POST_RSYNC_HOOKS += SECTA_CARGO_VENDOR
SECTA_EXTRACT_DEPENDENCIES += host-rustc

# Do not copy build output and the web app's node_modules.
SECTA_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude target --exclude node_modules --exclude demo-data

SECTA_FEATURES = $(call qstrip,$(BR2_PACKAGE_SECTA_FEATURES))
ifneq ($(SECTA_FEATURES),)
SECTA_CARGO_BUILD_OPTS += --features "$(SECTA_FEATURES)"
SECTA_CARGO_INSTALL_OPTS += --features "$(SECTA_FEATURES)"
endif

ifeq ($(BR2_PACKAGE_SECTA_WEB_UI),y)
define SECTA_INSTALL_WEB_UI
	if [ -f $(@D)/web-ui/dist/index.html ]; then \
		mkdir -p $(TARGET_DIR)/usr/share/secta/web-ui && \
		cp -a $(@D)/web-ui/dist/. $(TARGET_DIR)/usr/share/secta/web-ui/; \
	else \
		echo "secta: web-ui/dist is not built (cd web-ui && npm ci && npm run build); no web app in the image"; \
	fi
endef
SECTA_POST_INSTALL_TARGET_HOOKS += SECTA_INSTALL_WEB_UI
endif

$(eval $(cargo-package))
