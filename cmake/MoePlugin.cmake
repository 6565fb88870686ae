# moe_add_router_plugin(<name> SOURCES <files...>)
# Builds lib<name>.so ... as <name>.so in the plugin folder, against the SDK
# headers only, exporting just the versioned entry symbol.
function(moe_add_router_plugin name)
  cmake_parse_arguments(P "" "" "SOURCES" ${ARGN})
  add_library(moe_plugin_${name} MODULE ${P_SOURCES})
  target_link_libraries(moe_plugin_${name} PRIVATE moe::sdk m)
  set_target_properties(moe_plugin_${name} PROPERTIES
    OUTPUT_NAME ${name}
    PREFIX ""
    C_VISIBILITY_PRESET hidden
    LIBRARY_OUTPUT_DIRECTORY ${MOE_PLUGIN_OUTPUT_DIR})
  install(TARGETS moe_plugin_${name} LIBRARY DESTINATION ${MOE_INSTALL_PLUGIN_DIR})
endfunction()
